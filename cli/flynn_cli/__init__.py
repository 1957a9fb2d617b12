"""`flynn`: the command-line client of a Flynn cluster's controller."""
