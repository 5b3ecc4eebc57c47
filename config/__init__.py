"""Deployment configuration: settings from the environment, catalog files, gunicorn config."""
