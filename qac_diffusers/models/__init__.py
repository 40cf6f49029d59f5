from .edm_denoiser import edm_denoise
from .fsq_condition_encoder import FSQConditionEncoder, FSQConditionEncoderOutput, quantize, straight_through_quantize
from .gaussian_condition_encoder import GaussianConditionEncoder, GaussianConditionEncoderOutput, gaussian_kl
from .noise_encoder import NoiseEncoder, NoiseEncoderOutput, encode_jointly
from .unet_2d_qac import CodeEmbedding, QACUNet2DModel
