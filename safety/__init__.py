"""Safety and PII guards, the guard chain and streaming redaction."""
