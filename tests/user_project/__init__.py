"""The user-project suite: a model and data module written like a user's, never our own classes."""
