"""Kafka consumers: the router (provider calls) and the usage ledger writer."""
