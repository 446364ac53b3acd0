//! DINO ViT-S/16 embeddings: preprocessing, CLS embedding, cosine similarity. (in progress)
