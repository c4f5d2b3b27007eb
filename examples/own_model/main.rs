//! ringtrain's worker with a model and a data format of your own: each is one file (its config
//! keys, checks, builder or loader) and one line below that registers it. Start it as you start
//! `ringtrain`:
//!
//! ```sh
//! ringrun --nproc-per-node 2 target/release/examples/own_model --config examples/own_model/blobs.yaml
//! ```

mod blobs;
mod wide_relu;

fn main() -> std::process::ExitCode {
    ringtrain::models::MODELS.register(wide_relu::KIND).expect("a new model name");
    ringtrain::data::FORMATS.register(blobs::KIND).expect("a new data format name");
    ringtrain::worker::main()
}
