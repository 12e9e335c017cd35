#[memscope::instrument]
fn broken() -> u32 {
    let x = ;
    x
}

fn main() {
    let _ = broken();
}
