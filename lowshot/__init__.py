"""lowshot-diffusion: low-shot learning with large-scale diffusion (Douze et al., CVPR'18), in Python 3.

Library code used by the stage scripts at the top level of the repository; see the README.
"""
