"""Split backbones (registered in models.split.ARCHITECTURES) and the layers they share."""
from models import resnet  # noqa: F401  (registers ResNet18, ResNet34, ResNet50)
