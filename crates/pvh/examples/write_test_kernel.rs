//! Writes the PVH test kernel to a file, e.g. to boot it under QEMU:
//! `cargo run -p pvh --example write_test_kernel -- /tmp/pvh-test.elf [--elf32]`, then
//! `qemu-system-x86_64 -accel kvm -cpu qemu64,+x2apic -smp 2 -m 128 -nographic
//!  -device isa-debug-exit,iobase=0x501,iosize=1 -kernel /tmp/pvh-test.elf -append "cpus=2"`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let path = args
        .next()
        .ok_or("usage: write_test_kernel FILE [--elf32]")?;
    let elf32 = args.next().as_deref() == Some("--elf32");
    let elf = pvh::test_kernel::build(&pvh::test_kernel::TestKernelParams { elf32 })?;
    std::fs::write(&path, &elf)?;
    println!("{path}: {} bytes", elf.len());
    Ok(())
}
