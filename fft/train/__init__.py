"""fft.train."""
