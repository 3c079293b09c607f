"""Split backbones (registered in models.split.ARCHITECTURES) and the layers they share."""
# Importing a backbone's module registers it; this order is the order --arch lists them in.
from models import (
    mobilenetv2,  # MobileNetV2
    resnet,  # ResNet18, ResNet34, ResNet50
    vgg,  # VGG11, VGG13, VGG16, VGG19
)

__all__ = ["resnet", "vgg", "mobilenetv2"]
