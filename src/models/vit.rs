//! Hugging Face `ViTModel` (DINO weights). (in progress)
