"""Optimisers, schedules and densification strategies."""
