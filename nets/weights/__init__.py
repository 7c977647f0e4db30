"""Reading other projects' weight files into our models, with a report of what matched."""
