"""fft.eval."""
