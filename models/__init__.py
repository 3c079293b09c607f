"""Split backbones (registered in models.split.ARCHITECTURES) and the layers they share."""
# Importing a backbone's module registers it; this order is the order --arch lists them in.
from models import resnet  # ResNet18, ResNet34, ResNet50
from models import vgg  # VGG11, VGG13, VGG16, VGG19
from models import mobilenetv2  # MobileNetV2

__all__ = ["resnet", "vgg", "mobilenetv2"]
