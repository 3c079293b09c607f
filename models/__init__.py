"""Split ResNet backbones and self-supervised heads."""
