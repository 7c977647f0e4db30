"""The attention study: variants x seeds as ordinary training runs, packed onto the hardware, then the statistics."""
