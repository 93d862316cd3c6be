"""Image inpainting GAN: SE-ResNet generator, global+local context discriminators, contextual loss.

Plain PyTorch; never imports ray. See README.md.
"""

__version__ = "0.1.0"


def __getattr__(name):
    # Inpainter pulls in the models; keep `import inpaint.config` light for job start-up.
    if name == "Inpainter":
        from inpaint.inference import Inpainter

        return Inpainter
    raise AttributeError(name)
