"""open_clip models: loading by name/tag/checkpoint, the Encoder protocol, exact short-context text encoding."""
