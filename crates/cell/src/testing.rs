//! Fixtures for tests of a cell, in this crate and beside it: the packaged
//! test model as a cell serves it, and a vehicle that holds it.

use cell_api::served::{PieceTable, ServedModels};

/// The served models of a cell that serves the test model (its tokenizer
/// loaded from the model store; nothing runs).
pub fn served_test_model() -> ServedModels {
    let tokenizer = engine::Tokenizer::load(&engine::testing::test_model_path())
        .expect("load the test model's tokenizer");
    let pieces = PieceTable::build(&tokenizer);
    let mut served = ServedModels::default();
    served.add(
        engine::testing::TEST_MODEL_NAME.to_owned(),
        engine::testing::TEST_MODEL_SHA256.to_owned(),
        tokenizer,
        pieces,
        2048,
        0,
    );
    served
}

/// The `Hello` of a plugged-in vehicle with `slots` slots and the test model
/// loaded.
pub fn serving_hello(slots: u32) -> proto::Hello {
    proto::Hello {
        hardware: Some(proto::Hardware {
            parallel_sequences: slots,
            decode_tokens_per_second: 20.0,
            prefill_tokens_per_second: 200.0,
            ..proto::Hardware::default()
        }),
        models: vec![proto::CachedModel {
            name: engine::testing::TEST_MODEL_NAME.to_owned(),
            sha256: engine::testing::TEST_MODEL_SHA256.to_owned(),
            size_bytes: 1,
            loaded: true,
        }],
        state: Some(proto::VehicleState {
            plugged_in: true,
            charging: true,
            state_of_charge: 0.8,
            temperature_c: 30.0,
            ..proto::VehicleState::default()
        }),
        ..proto::Hello::default()
    }
}
