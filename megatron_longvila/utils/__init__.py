"""Small dependency-free utilities below every other package (they import nothing of ours)."""
