"""The web UI's tabs, one module each: its layout, its handlers and (for a training tab) its job."""
