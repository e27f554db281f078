"""Developer tools run from the repository root as modules (`python -m scripts.bench.<name>`); the shell scripts
beside them are for users."""
