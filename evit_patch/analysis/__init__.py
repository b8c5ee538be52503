"""Which patches survive: token tracking and its drawing."""
