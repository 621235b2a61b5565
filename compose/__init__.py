"""How the pieces start: the CLI, the local stack launcher and deployment files."""
