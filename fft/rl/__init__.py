"""fft.rl."""
