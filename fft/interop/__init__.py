"""fft.interop."""
