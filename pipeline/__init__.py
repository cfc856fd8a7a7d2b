"""pomvid: text-to-video diffusion with the Polynomial Mixer, trained at scale."""

__version__ = "0.1.0"
