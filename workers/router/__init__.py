"""The router worker: consumes requests, calls a provider, streams reply frames back."""
