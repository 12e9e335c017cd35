#[memscope::instrument]
mod elsewhere;

fn main() {}
