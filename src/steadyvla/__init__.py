"""steadyvla: crash-proof, bit-exact resumable fine-tuning and training of OpenVLA-style VLAs."""

__version__ = "0.1.0"
