#[memscope::instrument]
fn total(items: &[u32]) -> u32 {
    let sum: u32 = items.iter().sum();
    let label: String = sum;
    label.len() as u32
}

#[memscope::instrument]
async fn fetch() -> Result<u32, String> {
    let n: u32 = "4".parse().map_err(|_| "bad")?;
    Ok(n)
}

fn main() {
    let _ = total(&[1]);
    let _ = fetch();
}
