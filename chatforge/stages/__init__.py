"""One module per stage, each exposing `run(config)`."""
