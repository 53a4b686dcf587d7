//! The networks' configs as the loading layer reads them from their files: the UNet's
//! `unet/config.json` and PixArt's `transformer/config.json` (diffusers' keys), checked against
//! what the networks implement.

use serde_json::{json, Value};
use tt_scale::bench::models::sdxl_base_unet_json;
use tt_scale::loading::{model_config, LoadError};
use tt_scale::models::pixart::PixArtConfig;
use tt_scale::models::unet::UNetConfig;

fn unet(value: &Value) -> Result<UNetConfig, LoadError> {
    model_config(value, "unet/config.json")
}

fn pixart(value: &Value) -> Result<PixArtConfig, LoadError> {
    model_config(value, "transformer/config.json")
}

fn sdxl_base() -> Value {
    sdxl_base_unet_json()
}

#[test]
fn sdxl_base_config_reads_heads_layers_and_text_time_dims() {
    let c = unet(&sdxl_base()).unwrap();
    assert_eq!(c.num_attention_heads, vec![5, 10, 20]);
    assert_eq!(c.transformer_layers_per_block, vec![1, 2, 10]);
    assert_eq!(c.down_cross_attention, vec![false, true, true]);
    assert_eq!(c.up_cross_attention, vec![true, true, false]);
    assert_eq!(c.text_time, Some((256, 2816)));
    assert_eq!(c.cross_attention_dim, 2048);
    assert!(c.use_linear_projection);
}

#[test]
fn unsupported_unet_features_are_named() {
    let mut cfg = sdxl_base();
    cfg["class_embed_type"] = json!("timestep");
    let err = unet(&cfg).unwrap_err();
    assert!(matches!(err, LoadError::Unsupported(_)));
    assert!(err.to_string().contains("class_embed_type"), "{err}");
}

#[test]
fn a_transformer_layer_list_of_the_wrong_length_names_the_key() {
    let mut cfg = sdxl_base();
    cfg["transformer_layers_per_block"] = json!([1, 2]);
    let err = unet(&cfg).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("unet/config.json") && msg.contains("transformer_layers_per_block"),
        "{msg}"
    );
}

#[test]
fn sigma_defaults_follow_sample_size() {
    let cfg = serde_json::json!({"sample_size": 128, "caption_channels": 4096,
        "use_additional_conditions": false, "interpolation_scale": null, "out_channels": 8});
    let c = pixart(&cfg).unwrap();
    assert_eq!(c, PixArtConfig::sigma_xl_1024());
}

#[test]
fn additional_conditions_are_unsupported_by_name() {
    let cfg = serde_json::json!({"sample_size": 128, "caption_channels": 4096});
    let err = pixart(&cfg).unwrap_err();
    assert!(
        err.to_string().contains("use_additional_conditions"),
        "{err}"
    );
}
