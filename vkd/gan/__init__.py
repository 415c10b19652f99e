"""Data-limited image generation with VkD distillation into the discriminator (VkD's third experiment).

``models``    BigGAN-style conditional generator / projection discriminator for 32 px images
``augment``   DiffAugment (colour, translation, cutout)
``features``  frozen image embeddings: a CIFAR classifier's pooled features, CLIP ViT-B/32
``fid``       Fréchet distance (torchmetrics) in Inception's or another named feature space; within-class spread
``train``     ``train_gan(GANConfig(...))``: the DiffAugment baseline and VkD, checkpointed and resumable
"""

from .augment import DIFFAUGMENT_POLICY, diff_augment
from .features import ImageEmbedding, classifier_embedding, clip_embedding
from .fid import FID, class_spread, to_uint8
from .models import Discriminator, Generator
from .train import (
    GAN_METHODS,
    GANConfig,
    build_teacher_embedding,
    evaluation_embedding,
    fid_real_images,
    generate,
    load_generator,
    train_gan,
)
