"""Small command-line tools (jobs layer): model summary, schedule printout."""
