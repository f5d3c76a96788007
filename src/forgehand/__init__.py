"""forgehand: turn an issue into a tested draft merge request, working in ephemeral sandboxes."""

__version__ = "0.1.0"
