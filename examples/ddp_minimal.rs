//! The smallest data-parallel program: `ringrun --nproc-per-node 2 target/release/examples/ddp_minimal`
use ringtrain::data::DistributedSampler;
use ringtrain::{Ddp, DdpOptions, InitOptions};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Kind, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Rank, world size and rendezvous from ringrun, mpirun or srun (alone: a group of one).
    let pg = ringtrain::init(InitOptions::default())?;
    let dev = pg.device();
    tch::manual_seed(0); // the same 4096 points on every rank, labelled by a fixed linear rule
    let x = Tensor::randn([4096, 16], (Kind::Float, dev));
    let y = x.matmul(&Tensor::randn([16, 4], (Kind::Float, dev))).argmax(1, false);
    let vs = nn::VarStore::new(dev);
    let fc1 = nn::linear(vs.root() / "fc1", 16, 64, Default::default());
    let fc2 = nn::linear(vs.root() / "fc2", 64, 4, Default::default());
    let net = nn::seq().add(fc1).add_fn(|t| t.relu()).add(fc2);
    let mut ddp = Ddp::from_var_store(&pg, &vs, DdpOptions::default())?; // rank 0's weights everywhere
    let mut opt = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, 0.05)?;
    let mut sampler = DistributedSampler::new(4096, pg.world_size(), pg.rank(), true, 0, false);
    for epoch in 0..5 {
        sampler.set_epoch(epoch); // this rank's share of a new shuffle
        for batch in sampler.indices().chunks(64) {
            let idx = Tensor::from_slice(&batch.iter().map(|&i| i as i64).collect::<Vec<_>>()).to_device(dev);
            let loss = net.forward(&x.index_select(0, &idx)).cross_entropy_for_logits(&y.index_select(0, &idx));
            ddp.zero_grad()?;
            ddp.backward(&loss)?; // backward, gradients averaged across ranks as they are ready
            opt.step();
        }
    }
    let acc = net.forward(&x).accuracy_for_logits(&y).double_value(&[]);
    println!("rank {}: accuracy {:.1}%, parameter hash {:016x}", pg.rank(), 100.0 * acc, ddp.state_hash()?);
    pg.finish();
    Ok(())
}
