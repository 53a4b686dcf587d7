//! Black Forest Labs' tensor names served from a diffusers `transformer/` folder
//! ([`DiffusersFluxWeights`]): `to_q/to_k/to_v` concatenated into `qkv`, the final layer's
//! scale/shift halves swapped.

use candle_core::{DType, Device, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// Fails with a message naming the tensor when `t` does not have `shape`.
fn check_shape(t: Tensor, shape: &candle_core::Shape, name: &str) -> candle_core::Result<Tensor> {
    if t.shape() != shape {
        candle_core::bail!(
            "tensor {name} has shape {:?}, expected {:?}",
            t.dims(),
            shape.dims()
        );
    }
    Ok(t)
}

/// Serves Black Forest Labs' tensor names from a diffusers `transformer/` folder.
pub struct DiffusersFluxWeights {
    inner: VarBuilder<'static>,
}

impl DiffusersFluxWeights {
    /// A var builder with BFL names over `inner` (diffusers names), in `dtype` on `device`.
    pub fn var_builder(
        inner: VarBuilder<'static>,
        dtype: DType,
        device: &Device,
    ) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Self { inner }), dtype, device.clone())
    }

    /// The diffusers tensors that make up the BFL tensor `name`, and whether the two halves of
    /// the result must be swapped (the final layer's modulation).
    fn sources(name: &str) -> Option<(Vec<String>, bool)> {
        let (stem, leaf) = name.rsplit_once('.')?;
        let one = |s: &str| Some((vec![format!("{s}.{leaf}")], false));
        let parts: Vec<&str> = stem.split('.').collect();
        match parts.as_slice() {
            ["img_in"] => one("x_embedder"),
            ["txt_in"] => one("context_embedder"),
            ["time_in", l] => one(&format!(
                "time_text_embed.timestep_embedder.{}",
                mlp_layer(l)?
            )),
            ["guidance_in", l] => one(&format!(
                "time_text_embed.guidance_embedder.{}",
                mlp_layer(l)?
            )),
            ["vector_in", l] => one(&format!("time_text_embed.text_embedder.{}", mlp_layer(l)?)),
            ["final_layer", "linear"] => one("proj_out"),
            ["final_layer", "adaLN_modulation", "1"] => {
                Some((vec![format!("norm_out.linear.{leaf}")], true))
            }
            ["double_blocks", i, rest @ ..] => {
                let b = format!("transformer_blocks.{i}");
                let s = match rest {
                    ["img_mod", "lin"] => format!("{b}.norm1.linear"),
                    ["txt_mod", "lin"] => format!("{b}.norm1_context.linear"),
                    ["img_attn", "qkv"] => {
                        return Some((
                            ["to_q", "to_k", "to_v"]
                                .iter()
                                .map(|x| format!("{b}.attn.{x}.{leaf}"))
                                .collect(),
                            false,
                        ))
                    }
                    ["txt_attn", "qkv"] => {
                        return Some((
                            ["add_q_proj", "add_k_proj", "add_v_proj"]
                                .iter()
                                .map(|x| format!("{b}.attn.{x}.{leaf}"))
                                .collect(),
                            false,
                        ))
                    }
                    ["img_attn", "proj"] => format!("{b}.attn.to_out.0"),
                    ["txt_attn", "proj"] => format!("{b}.attn.to_add_out"),
                    ["img_attn", "norm", "query_norm"] => {
                        return one_w(&format!("{b}.attn.norm_q"))
                    }
                    ["img_attn", "norm", "key_norm"] => return one_w(&format!("{b}.attn.norm_k")),
                    ["txt_attn", "norm", "query_norm"] => {
                        return one_w(&format!("{b}.attn.norm_added_q"))
                    }
                    ["txt_attn", "norm", "key_norm"] => {
                        return one_w(&format!("{b}.attn.norm_added_k"))
                    }
                    ["img_mlp", "0"] => format!("{b}.ff.net.0.proj"),
                    ["img_mlp", "2"] => format!("{b}.ff.net.2"),
                    ["txt_mlp", "0"] => format!("{b}.ff_context.net.0.proj"),
                    ["txt_mlp", "2"] => format!("{b}.ff_context.net.2"),
                    _ => return None,
                };
                one(&s)
            }
            ["single_blocks", i, rest @ ..] => {
                let b = format!("single_transformer_blocks.{i}");
                let s = match rest {
                    ["modulation", "lin"] => format!("{b}.norm.linear"),
                    ["linear1"] => {
                        return Some((
                            ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
                                .iter()
                                .map(|x| format!("{b}.{x}.{leaf}"))
                                .collect(),
                            false,
                        ))
                    }
                    ["linear2"] => format!("{b}.proj_out"),
                    ["norm", "query_norm"] => return one_w(&format!("{b}.attn.norm_q")),
                    ["norm", "key_norm"] => return one_w(&format!("{b}.attn.norm_k")),
                    _ => return None,
                };
                one(&s)
            }
            _ => None,
        }
    }
}

/// BFL `in_layer`/`out_layer` → diffusers `linear_1`/`linear_2`.
fn mlp_layer(l: &str) -> Option<&'static str> {
    match l {
        "in_layer" => Some("linear_1"),
        "out_layer" => Some("linear_2"),
        _ => None,
    }
}

/// A BFL norm `scale` is a diffusers RMSNorm `weight`.
fn one_w(stem: &str) -> Option<(Vec<String>, bool)> {
    Some((vec![format!("{stem}.weight")], false))
}

impl SimpleBackend for DiffusersFluxWeights {
    fn get(
        &self,
        s: candle_core::Shape,
        name: &str,
        _h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        check_shape(t, &s, name)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((sources, swap)) = Self::sources(name) else {
            candle_core::bail!("no diffusers tensor corresponds to the Flux tensor {name}")
        };
        let parts = sources
            .iter()
            .map(|s| self.inner.get_unchecked_dtype(s, dtype))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let t = match <[Tensor; 1]>::try_from(parts) {
            Ok([t]) => t,
            Err(parts) => Tensor::cat(&parts, 0)?,
        };
        let t = if swap {
            let n = t.dim(0)? / 2;
            Tensor::cat(&[t.narrow(0, n, n)?, t.narrow(0, 0, n)?], 0)?
        } else {
            t
        };
        t.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        Self::sources(name).is_some_and(|(s, _)| s.iter().all(|n| self.inner.contains_tensor(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_qkv_names_map_to_the_three_projections() {
        let (s, swap) = DiffusersFluxWeights::sources("double_blocks.3.txt_attn.qkv.bias").unwrap();
        assert_eq!(
            s,
            vec![
                "transformer_blocks.3.attn.add_q_proj.bias",
                "transformer_blocks.3.attn.add_k_proj.bias",
                "transformer_blocks.3.attn.add_v_proj.bias"
            ]
        );
        assert!(!swap);
        let (_, swap) =
            DiffusersFluxWeights::sources("final_layer.adaLN_modulation.1.weight").unwrap();
        assert!(swap);
    }
}
