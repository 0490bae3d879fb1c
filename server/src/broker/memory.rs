//! The in-process broker: one node, events go straight to the local hub.

use async_trait::async_trait;

use super::{Broker, BrokerError, Event};
use crate::hub::Hub;

pub struct MemoryBroker {
    hub: Hub,
}

impl MemoryBroker {
    pub fn new(hub: Hub) -> MemoryBroker {
        MemoryBroker { hub }
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, events: Vec<Event>) -> Result<(), BrokerError> {
        for event in &events {
            self.hub.deliver(&event.user_id, &event.delivery);
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn subscribed(&self, _: &str) {}

    async fn presence(&self, user: &str) -> Result<u64, BrokerError> {
        Ok(self.hub.local_sessions(user) as u64)
    }
}
