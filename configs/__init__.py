"""ml-collections `get_config()` files; pass one with --config=configs/<name>.py:<arg>."""
