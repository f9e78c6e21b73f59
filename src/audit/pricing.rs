//! Prices and exact cost arithmetic (DESIGN §7).
//!
//! Prices are held as integer picodollars (1e-12 USD) per token: a price of 0.42 USD per 1M
//! tokens is 420,000 pUSD/token. Costs are then integer products, so the sum of a million rows
//! and the Prometheus counter agree exactly instead of drifting apart by float rounding. Any
//! price with at most six decimals per 1M tokens (every public price list) is represented exactly.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::record::CostStatus;
use super::usage::Usage;
use crate::config::PricingConfig;

/// Picodollars per USD.
pub const PICO_PER_USD: f64 = 1e12;

/// A model's price in picodollars per token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Price {
    /// Per input token.
    pub input: u64,
    /// Per output token.
    pub output: u64,
    /// Per cached input token, when the provider discounts them.
    pub cache_read: Option<u64>,
}

impl Price {
    /// From USD per 1M tokens (the way price lists are written).
    pub fn per_million(
        input: f64,
        output: f64,
        cache_read: Option<f64>,
    ) -> Result<Self, PricingError> {
        Ok(Self {
            input: per_million_to_pico(input)?,
            output: per_million_to_pico(output)?,
            cache_read: cache_read.map(per_million_to_pico).transpose()?,
        })
    }

    /// Exact cost of `usage` in picodollars (saturating: no real call comes near 18 M USD).
    pub fn cost(&self, usage: &Usage) -> u64 {
        let cached = usage.cached.clamp(0, usage.input.max(0)) as u64;
        let uncached = usage.input.max(0) as u64 - cached;
        let output = usage.output.max(0) as u64;
        let cache_price = self.cache_read.unwrap_or(self.input);
        uncached
            .saturating_mul(self.input)
            .saturating_add(cached.saturating_mul(cache_price))
            .saturating_add(output.saturating_mul(self.output))
    }
}

/// A price that cannot be represented.
#[derive(Debug, thiserror::Error)]
pub enum PricingError {
    /// Negative, NaN or absurdly large.
    #[error("invalid price {0} (USD per 1M tokens must be a finite number ≥ 0)")]
    Invalid(f64),
    /// The price file could not be read.
    #[error("cannot read price file {path}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The price file is neither our format nor LiteLLM's.
    #[error("cannot parse price file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
}

fn per_million_to_pico(usd_per_million: f64) -> Result<u64, PricingError> {
    // USD per 1M tokens × 1e12 pUSD/USD ÷ 1e6 tokens = × 1e6.
    to_pico(usd_per_million, 1e6)
}

fn to_pico(value: f64, scale: f64) -> Result<u64, PricingError> {
    let pico = (value * scale).round();
    if !value.is_finite() || value < 0.0 || pico > 1e15 {
        return Err(PricingError::Invalid(value));
    }
    Ok(pico as u64)
}

/// The result of pricing one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cost {
    /// Exact cost in 1e-12 USD (0 when unpriced).
    pub picousd: u64,
    /// How it was priced.
    pub status: CostStatus,
}

impl Cost {
    /// The cost in USD (nearest double to the exact value).
    pub fn usd(&self) -> f64 {
        self.picousd as f64 / PICO_PER_USD
    }
}

/// Model prices plus the fallback for unknown models.
#[derive(Clone, Debug)]
pub struct PriceTable {
    models: HashMap<String, Price>,
    fallback: Option<Price>,
}

/// The seed's table, USD per 1M tokens (input, output).
const SEED_PRICES: [(&str, f64, f64); 7] = [
    ("gpt-4.1", 8.0, 32.0),
    ("gpt-4.1-mini", 1.5, 6.0),
    ("claude-sonnet-4-20250514", 15.0, 75.0),
    ("claude-3-5-sonnet-20241022", 3.0, 15.0),
    ("gemini-2.5-flash", 2.5, 10.0),
    ("deepseek-chat", 0.42, 1.68),
    ("deepseek-coder", 0.55, 2.19),
];

impl Default for PriceTable {
    /// The seed's seven models with the seed's fallback (10 / 30 USD per 1M tokens).
    fn default() -> Self {
        let models = SEED_PRICES
            .iter()
            .map(|(m, i, o)| ((*m).to_owned(), seed_price(*i, *o)))
            .collect();
        Self {
            models,
            fallback: Some(seed_price(10.0, 30.0)),
        }
    }
}

fn seed_price(input: f64, output: f64) -> Price {
    // Every seed price has at most two decimals, so this never fails.
    Price::per_million(input, output, None).unwrap_or(Price {
        input: 0,
        output: 0,
        cache_read: None,
    })
}

/// Our price file: `[models."name"] input = …, output = …, cache_read = …` (TOML or JSON).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    models: HashMap<String, PriceEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceEntry {
    input: f64,
    output: f64,
    cache_read: Option<f64>,
}

impl PriceTable {
    /// The table a config describes: seed defaults, overridden by `file`, with its fallback.
    pub fn from_config(cfg: &PricingConfig) -> Result<Self, PricingError> {
        let mut table = Self::default();
        if let Some(path) = &cfg.file {
            table.load_file(path)?;
        }
        table.fallback = match (cfg.fallback_input, cfg.fallback_output) {
            (Some(i), Some(o)) => Some(Price::per_million(i, o, None)?),
            _ => None,
        };
        Ok(table)
    }

    /// A table with no fallback: unknown models are `unpriced`.
    pub fn without_fallback(mut self) -> Self {
        self.fallback = None;
        self
    }

    /// Sets or replaces one model's price.
    pub fn insert(&mut self, model: impl Into<String>, price: Price) {
        self.models.insert(model.into(), price);
    }

    /// Whether `model` has its own price (used to cap unknown model labels).
    pub fn knows(&self, model: &str) -> bool {
        // Exact names only: `anything/gpt-4.1` is priced like gpt-4.1 but must not bypass the
        // label cap, or a client could mint unbounded series.
        self.models.contains_key(model)
    }

    /// Merges prices from a file: our TOML/JSON format, or LiteLLM's
    /// `model_prices_and_context_window.json` (per-token USD costs).
    pub fn load_file(&mut self, path: &Path) -> Result<(), PricingError> {
        let text = std::fs::read_to_string(path).map_err(|source| PricingError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let parse_err = |message: String| PricingError::Parse {
            path: path.display().to_string(),
            message,
        };
        let is_toml = path.extension().is_some_and(|e| e == "toml");
        let value: Value = if is_toml {
            toml::from_str(&text).map_err(|e| parse_err(e.to_string()))?
        } else {
            serde_json::from_str(&text).map_err(|e| parse_err(e.to_string()))?
        };
        if value.get("models").is_some() {
            let file: PriceFile =
                serde_json::from_value(value).map_err(|e| parse_err(e.to_string()))?;
            for (model, e) in file.models {
                self.insert(model, Price::per_million(e.input, e.output, e.cache_read)?);
            }
            return Ok(());
        }
        let Value::Object(entries) = value else {
            return Err(parse_err("expected an object of models".into()));
        };
        let mut loaded = 0;
        for (model, entry) in entries {
            let per_token = |k: &str| entry.get(k).and_then(Value::as_f64);
            // LiteLLM's file opens with a `sample_spec` documentation entry; entries without
            // token prices (image models, per-second pricing) are skipped.
            let (Some(input), Some(output)) = (
                per_token("input_cost_per_token"),
                per_token("output_cost_per_token"),
            ) else {
                continue;
            };
            if model == "sample_spec" {
                continue;
            }
            let cache_read = per_token("cache_read_input_token_cost")
                .map(|c| to_pico(c, PICO_PER_USD))
                .transpose()?;
            let price = Price {
                input: to_pico(input, PICO_PER_USD)?,
                output: to_pico(output, PICO_PER_USD)?,
                cache_read,
            };
            self.insert(model, price);
            loaded += 1;
        }
        if loaded == 0 {
            return Err(parse_err("no model with input/output prices found".into()));
        }
        Ok(())
    }

    /// The model's own price: exact name, then without a `provider/` prefix.
    fn lookup(&self, model: &str) -> Option<&Price> {
        self.models.get(model).or_else(|| {
            model
                .split_once('/')
                .and_then(|(_, bare)| self.models.get(bare))
        })
    }

    /// Prices a call. `response_model` is tried when the requested name is unknown
    /// (e.g. an alias that the provider resolved to a dated model).
    pub fn cost(&self, model: &str, response_model: Option<&str>, usage: &Usage) -> Cost {
        let own = self
            .lookup(model)
            .or_else(|| response_model.and_then(|m| self.lookup(m)));
        match (own, &self.fallback) {
            (Some(p), _) => Cost {
                picousd: p.cost(usage),
                status: CostStatus::Priced,
            },
            (None, Some(f)) => Cost {
                picousd: f.cost(usage),
                status: CostStatus::Fallback,
            },
            (None, None) => Cost {
                picousd: 0,
                status: CostStatus::Unpriced,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(input: i64, output: i64, cached: i64) -> Usage {
        Usage {
            input,
            output,
            total: input + output,
            cached,
            reasoning: 0,
        }
    }

    #[test]
    fn seed_prices_exact() {
        let t = PriceTable::default();
        // deepseek-chat: 1000 in × 0.42 + 500 out × 1.68 per 1M = 0.00042 + 0.00084 USD
        let c = t.cost("deepseek-chat", None, &usage(1000, 500, 0));
        assert_eq!(c.picousd, 1_260_000_000);
        assert_eq!(c.status, CostStatus::Priced);
        // The seed rounds to 6 decimals; we keep 1 token of gpt-4.1-mini = 1.5e-6 USD exactly.
        assert_eq!(
            t.cost("gpt-4.1-mini", None, &usage(1, 0, 0)).picousd,
            1_500_000
        );
    }

    #[test]
    fn unknown_models_fall_back_or_are_unpriced() {
        let t = PriceTable::default();
        let c = t.cost("mystery-1", None, &usage(1_000_000, 0, 0));
        assert_eq!((c.usd(), c.status), (10.0, CostStatus::Fallback));
        let c = t
            .clone()
            .without_fallback()
            .cost("mystery-1", None, &usage(5, 5, 0));
        assert_eq!((c.picousd, c.status), (0, CostStatus::Unpriced));
        let c = t.cost("openai/gpt-4.1", None, &usage(1, 0, 0));
        assert_eq!(c.status, CostStatus::Priced);
        // Priced like gpt-4.1, but not an exact name: it does not bypass the model label cap.
        assert!(t.knows("gpt-4.1") && !t.knows("openai/gpt-4.1"));
    }

    #[test]
    fn cached_tokens_use_cache_price() {
        let mut t = PriceTable::default();
        t.insert("m", Price::per_million(2.0, 8.0, Some(0.5)).unwrap());
        // 100 uncached × 2.0 + 900 cached × 0.5 = 650 USD per 1M tokens = 6.5e-4 USD.
        assert_eq!(t.cost("m", None, &usage(1000, 0, 900)).picousd, 650_000_000);
    }
}
