"""The `cl` command (`main`): parses arguments, calls the runner, prints."""
