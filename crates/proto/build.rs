fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        // A KV checkpoint is megabytes: the coordinator hands the same buffer
        // to every assignment that restores it instead of copying it.
        .bytes(".fleetgrid.v1.Assign.restore_state")
        .compile_protos(&["proto/fleetgrid.proto"], &["proto"])?;
    Ok(())
}
