"""KV transfer: payload codec and checksum, wire header, pair channels, mailbox, vLLM connector."""
