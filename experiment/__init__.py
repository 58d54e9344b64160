"""The experiment beside perceptual_diffusion.py: see reproduce.py, its command line, for what each module holds."""
