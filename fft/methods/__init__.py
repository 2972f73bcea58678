"""fft.methods."""
