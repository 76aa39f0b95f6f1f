//! [`Valid`]: a configuration whose checks passed, so what receives one (a gateway source)
//! never validates again.

use std::ops::Deref;

use crate::FieldPath;

/// A configuration with its own field checks.
pub trait Validate {
    /// One problem; it names its field.
    type Error: FieldPath;
    /// Every problem found.
    fn check(&self) -> Result<(), Vec<Self::Error>>;
}

/// A configuration that passed its checks: made only by [`Valid::new`] (which runs them) and
/// by [`crate::parse`]/[`crate::load`] (which return it only when the whole file passed).
/// It derefs to the configuration; there is no way to change it afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Valid<T>(T);

impl<T: Validate> Valid<T> {
    /// Checks `config`.
    ///
    /// # Errors
    /// Every problem found.
    pub fn new(config: T) -> Result<Self, Vec<T::Error>> {
        config.check()?;
        Ok(Self(config))
    }
}

impl<T> Valid<T> {
    /// Wraps a configuration that the file loader validates before it returns anything.
    pub(crate) fn pending(config: T) -> Self {
        Self(config)
    }

    /// Resolves paths relative to the configuration file and records the key file's
    /// fingerprint (validity depends on neither).
    pub(crate) fn paths_mut(&mut self) -> &mut T {
        &mut self.0
    }

    /// The configuration.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Valid<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// One problem with a field of a configuration section that has no error type of its own
/// (uplink, CoAP, HTTP push and concentrator MQTT sources): the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct FieldProblem {
    /// Field path relative to the section (`topics[1].filter`).
    pub field: String,
    /// What is wrong and what was expected.
    pub reason: String,
}

impl FieldProblem {
    /// A problem with `field`.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl FieldPath for FieldProblem {
    fn field_path(&self) -> &str {
        &self.field
    }
}

/// `Ok` when nothing was found.
pub(crate) fn collected<E>(problems: Vec<E>) -> Result<(), Vec<E>> {
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

macro_rules! validate_with_inherent {
    ($($ty:ty => $err:ty),* $(,)?) => {$(
        impl Validate for $ty {
            type Error = $err;
            fn check(&self) -> Result<(), Vec<$err>> {
                self.validate()
            }
        }
    )*};
}

validate_with_inherent!(
    crate::modbus::ModbusTcpSourceConfig => crate::modbus::ModbusConfigError,
    crate::modbus::ModbusRtuSourceConfig => crate::modbus::ModbusConfigError,
    crate::mbus::MbusSerialSourceConfig => crate::mbus::MbusConfigError,
    crate::wmbus::WmbusUdpSourceConfig => crate::wmbus::WmbusConfigError,
    crate::hydrant::HydrantSourceConfig => crate::hydrant::HydrantConfigError,
    crate::UplinkConfig => FieldProblem,
    crate::concentrator::MqttSourceConfig => FieldProblem,
    crate::coap::CoapSourceConfig => FieldProblem,
    crate::http_push::HttpPushSourceConfig => FieldProblem,
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mbus::MbusSerialSourceConfig;

    #[test]
    fn only_checked_configs_are_valid() {
        let mut c = MbusSerialSourceConfig::new("/dev/ttyUSB0");
        c.search_secondary = true;
        c.baud_rate = 7;
        let errors = Valid::new(c.clone()).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field_path(), "baud_rate");
        c.baud_rate = 2400;
        let v = Valid::new(c).unwrap();
        assert_eq!(v.baud_rate, 2400);
    }
}
