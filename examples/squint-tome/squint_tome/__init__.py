"""ToMe-style token merging for Squint."""
