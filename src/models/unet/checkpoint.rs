//! Gradient checkpointing of the UNet, one segment per block (conv_in, each down block, the mid
//! block, each up block, the head), written by hand because tch has no `autograd.Function` or
//! `torch.utils.checkpoint`. This is coarser than diffusers' `enable_gradient_checkpointing`,
//! which wraps `torch.utils.checkpoint` around each resnet and each transformer block *inside* a
//! block (`CrossAttnDownBlock2D.forward` and `Transformer2DModel.forward` check
//! `self.gradient_checkpointing` per layer): ours
//! stores fewer segment inputs but holds one whole block's graph at a time during the backward
//! pass, so its peak is one block's activations where diffusers' is one layer's.
//!
//! The forward pass runs without a graph and keeps only what enters each segment (conv_in,
//! each down block, the mid block, each up block, the output head): the hidden state and the
//! skip tensors an up block consumes. The backward pass then walks the segments in reverse: it
//! recomputes one segment with a graph from detached inputs that require grad, and backpropagates
//! the surrogate Σ_k ⟨out_k, ∂L/∂out_k⟩ (the vector–Jacobian product of the segment), which
//! accumulates the segment's parameter gradients into their `.grad()` and yields the gradients
//! of its inputs for the segment before. The time embedding (on SDXL with the added embedding of
//! the pooled text embeds and size ids) and the text context, shared by all segments, are
//! leaves whose gradients accumulate over the segments and are backpropagated into
//! `time_embedding` / `add_embedding` (and the text encoders, when the context or the pooled
//! embeds require grad) at the end.
//!
//! Peak activation memory is thus one segment's graph plus the stored segment inputs, instead
//! of the whole UNet's graph, for one extra forward pass. The gradients equal the plain
//! backward's up to summation order (the shared leaves' contributions are added per segment).

use super::blocks::Cond;
use super::{spatial, AddedCond, UNet2DConditionModel};
use tch::{nn::Module, Kind, Tensor};

/// A detached copy of `t` that requires grad (a segment's input leaf).
fn leaf(t: &Tensor) -> Tensor {
    t.detach().set_requires_grad(true)
}

/// The gradient accumulated in a leaf (zeros if nothing reached it).
fn grad_of(t: &Tensor) -> Tensor {
    let g = t.grad();
    if g.defined() {
        g.detach()
    } else {
        t.zeros_like()
    }
}

/// Backpropagates Σ_k ⟨outs_k, grads_k⟩ (nothing when no output needs grad).
fn vjp(outs: &[&Tensor], grads: &[Tensor]) {
    let terms: Vec<Tensor> =
        outs.iter().zip(grads).filter(|(o, _)| o.requires_grad()).map(|(o, g)| (*o * g).sum(Kind::Float)).collect();
    if !terms.is_empty() {
        Tensor::stack(&terms, 0).sum(Kind::Float).backward();
    }
}

impl UNet2DConditionModel {
    /// The loss `loss_of(ε_θ(sample, t, context[, added]))` and its gradient, with the UNet's
    /// blocks checkpointed (see the module docs): the gradients are *accumulated* into `.grad()`
    /// of the UNet's trainable variables (and of whatever `context` and SDXL's `added` depend
    /// on, when they require grad), as `loss.backward()` would. Returns the loss, detached.
    /// float32 weights only.
    pub fn backward_checkpointed(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
        loss_of: &dyn Fn(&Tensor) -> Tensor,
    ) -> Tensor {
        // the shared inputs: the embedding keeps its (small) graph; both become leaves
        let temb = self.embedding(timesteps, sample, added);
        let temb_leaf = leaf(&temb);
        let ctx_leaf = if context.requires_grad() { leaf(context) } else { context.detach() };
        let sample = if self.config.center_input_sample { sample * 2.0 - 1.0 } else { sample.shallow_clone() };
        let forward_size = self.needs_upsample_size(&sample);

        // forward without a graph, keeping each segment's inputs
        let (down_in, mid_in, up_in, out_in, up_skips, sizes, skip_values) = tch::no_grad(|| {
            let cond = Cond { temb: &temb_leaf, context: &ctx_leaf };
            let h0 = self.conv_in.forward(&sample);
            let mut skips: Vec<Tensor> = vec![h0.shallow_clone()];
            let mut down_in = Vec::new();
            let mut h = h0.shallow_clone();
            for (i, block) in self.down_blocks.iter().enumerate() {
                down_in.push(h.shallow_clone());
                let (out, res) = block.forward(&h, cond, i, None);
                h = out;
                skips.extend(res);
            }
            let mid_in = self.mid_block.as_ref().map(|mid| {
                let input = h.shallow_clone();
                h = mid.forward(&h, cond, None);
                input
            });
            // which skips (indices in down order) each up block consumes, and its upsample size
            let mut remaining: Vec<usize> = (0..skips.len()).collect();
            let (mut up_in, mut up_skips, mut sizes) = (vec![], vec![], vec![]);
            for (i, block) in self.up_blocks.iter().enumerate() {
                let idx = remaining.split_off(remaining.len() - block.resnets.len());
                let size = remaining.last().filter(|_| forward_size).map(|&k| spatial(&skips[k]));
                up_in.push(h.shallow_clone());
                h = block.forward(&h, idx.iter().map(|&k| skips[k].shallow_clone()).collect(), cond, i, size, None);
                up_skips.push(idx);
                sizes.push(size);
            }
            (down_in, mid_in, up_in, h, up_skips, sizes, skips)
        });
        let n_skips = skip_values.len();
        let mut g_skip: Vec<Option<Tensor>> = (0..n_skips).map(|_| None).collect();

        // the head and the loss
        let h_leaf = leaf(&out_in);
        let pred = self.conv_out.forward(&self.conv_norm_out.forward(&h_leaf).silu());
        let loss = loss_of(&pred);
        loss.backward();
        let mut g_h = grad_of(&h_leaf);
        let cond = Cond { temb: &temb_leaf, context: &ctx_leaf };
        // up blocks, last first
        for i in (0..self.up_blocks.len()).rev() {
            let h_leaf = leaf(&up_in[i]);
            let skip_leaves: Vec<Tensor> = up_skips[i].iter().map(|&k| leaf(&skip_values[k])).collect();
            let out = self.up_blocks[i].forward(
                &h_leaf,
                skip_leaves.iter().map(Tensor::shallow_clone).collect(),
                cond,
                i,
                sizes[i],
                None,
            );
            vjp(&[&out], &[g_h]);
            g_h = grad_of(&h_leaf);
            for (&k, l) in up_skips[i].iter().zip(&skip_leaves) {
                g_skip[k] = Some(grad_of(l));
            }
        }
        if let (Some(mid), Some(input)) = (&self.mid_block, &mid_in) {
            let h_leaf = leaf(input);
            let out = mid.forward(&h_leaf, cond, None);
            vjp(&[&out], &[g_h]);
            g_h = grad_of(&h_leaf);
        }
        // down blocks, last first: their outputs are the next block's input and their skips
        let mut next_skip = n_skips;
        for i in (0..self.down_blocks.len()).rev() {
            let h_leaf = leaf(&down_in[i]);
            let (out, res) = self.down_blocks[i].forward(&h_leaf, cond, i, None);
            let first = next_skip - res.len();
            let mut outs: Vec<&Tensor> = vec![&out];
            let mut grads = vec![g_h];
            for (j, r) in res.iter().enumerate() {
                if let Some(g) = g_skip[first + j].take() {
                    outs.push(r);
                    grads.push(g);
                }
            }
            vjp(&outs, &grads);
            g_h = grad_of(&h_leaf);
            next_skip = first;
        }
        // conv_in: its output is the first block's input and the first skip
        let h0 = self.conv_in.forward(&sample);
        let g0 = match g_skip[0].take() {
            Some(g) => g_h + g,
            None => g_h,
        };
        vjp(&[&h0], &[g0]);
        // the shared leaves into the time embedding and the context's producer, in one backward
        // pass: on SDXL both reach the text encoders (the pooled embeds in the embedding)
        vjp(&[&temb, context], &[grad_of(&temb_leaf), grad_of(&ctx_leaf)]);
        loss.detach()
    }
}
