//! A checkpoint belongs to a run. Resuming one under a config that differs in what decides the
//! run's course would silently continue another experiment: the seed fixes every later epoch's
//! order, the model and data sections what the parameters mean. Schedules, epochs, learning
//! rates, logging and world size may change on resume (people extend and re-shape runs), and
//! so may where the data lives.

use crate::config::Config;
use serde_yaml::Value;

/// Sections and fields compared, as dotted paths into the resolved config.
const COMPARED: &[&str] = &["train.seed", "train.shuffle", "train.drop_last", "model", "data"];

/// Fields inside the compared sections that may change: locations and loader settings.
const FREE: &[&str] = &["model.init_from", "data.dir", "data.prepare_from", "data.workers", "data.prefetch_batches"];

/// The fields where `written` (a checkpoint's recorded config, YAML) and `current` differ, as
/// `path: written → current`; empty when they agree.
pub fn differences(written: &str, current: &Config) -> Result<Vec<String>, String> {
    let old: Value = serde_yaml::from_str(written).map_err(|e| format!("its recorded config does not parse: {e}"))?;
    let new: Value = serde_yaml::from_str(&current.to_yaml()).expect("a config serialises to YAML");
    let mut out = Vec::new();
    for path in COMPARED {
        diff(path, lookup(&old, path), lookup(&new, path), &mut out);
    }
    Ok(out)
}

fn lookup<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn diff(path: &str, old: Option<&Value>, new: Option<&Value>, out: &mut Vec<String>) {
    if FREE.contains(&path) {
        return;
    }
    match (old, new) {
        (Some(Value::Mapping(a)), Some(Value::Mapping(b))) => {
            let mut keys: Vec<&str> = a.keys().chain(b.keys()).filter_map(|k| k.as_str()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                diff(&format!("{path}.{k}"), a.get(k), b.get(k), out);
            }
        }
        (a, b) if a != b => out.push(format!("{path}: {} → {}", show(a), show(b))),
        _ => {}
    }
}

fn show(v: Option<&Value>) -> String {
    match v {
        None | Some(Value::Null) => "unset".into(),
        Some(v) => serde_yaml::to_string(v).unwrap_or_default().trim().replace('\n', " "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let yaml = format!(
            "model: {{name: mlp, hidden: [8]}}\n\
             data: {{format: synthetic, synthetic: {{train_samples: 64, test_samples: 16, shape: [4], classes: 2, seed: 1}}}}\n\
             train: {{epochs: 1, batch_size: 8, seed: 3}}\n\
             optimizer: {{name: sgd, lr: 0.1}}\n{extra}"
        );
        let cfg: Config = serde_yaml::from_str(&yaml).unwrap();
        cfg.validate().unwrap();
        cfg
    }

    #[test]
    fn the_seed_the_model_and_the_data_are_named_and_the_rest_may_change() {
        let base = config("");
        assert!(differences(&base.to_yaml(), &base).unwrap().is_empty());
        let mut other = base.clone();
        other.train.seed = 4;
        other.train.epochs = 5;
        other.optimizer.lr = 0.5;
        assert_eq!(differences(&base.to_yaml(), &other).unwrap(), vec!["train.seed: 3 → 4".to_string()]);
        let wider = config("").to_yaml().replace("- 8", "- 16");
        let d = differences(&wider, &base).unwrap();
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("model.hidden: "), "{d:?}");
        let reseeded = base.to_yaml().replace("seed: 1", "seed: 2");
        assert_eq!(differences(&reseeded, &base).unwrap(), vec!["data.synthetic.seed: 2 → 1".to_string()]);
    }
}
