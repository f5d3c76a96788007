"""Generated code; regenerate with scripts/gen-proto."""
